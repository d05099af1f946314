// What tsc cannot see: do the declarations name what the modules really export, and does
// RealtimeSnapshot list the snapshot's real fields? Run by tests/test_react.py; prints the
// differences as JSON and exits 1 when there are any.
import { register } from 'node:module'
import ts from 'typescript'

register('./hooks.mjs', import.meta.url) // react.js imports "react"
const STATIC = new URL('../../static/', import.meta.url)

const program = ts.createProgram([new URL('realtime.d.ts', STATIC).pathname, new URL('react.d.ts', STATIC).pathname], { noEmit: true })
const checker = program.getTypeChecker()
const declared = (file) => checker.getExportsOfModule(checker.getSymbolAtLocation(program.getSourceFile(new URL(file, STATIC).pathname)))

const differences = {}
function compare(what, declaredNames, realNames) {
  const missing = realNames.filter((name) => !declaredNames.includes(name))
  const extra = declaredNames.filter((name) => !realNames.includes(name))
  if (missing.length || extra.length) differences[what] = { undeclared: missing, declaredButAbsent: extra }
}

for (const name of ['realtime', 'react']) {
  const values = declared(`${name}.d.ts`).filter((symbol) => symbol.flags & ts.SymbolFlags.Value).map((symbol) => symbol.name)
  compare(`exports of ${name}.js`, values, Object.keys(await import(new URL(`${name}.js`, STATIC).href)))
}

const { subscribe } = await import(new URL('realtime.js', STATIC).href)
const idle = { EventSource: class { addEventListener() {} close() {} }, document: undefined, window: undefined }
const subscription = subscribe({ channel: 'c', topics: ['t'], token: 't', env: idle })
subscription.close()
const snapshotType = declared('realtime.d.ts').find((symbol) => symbol.name === 'RealtimeSnapshot')
compare('RealtimeSnapshot', checker.getDeclaredTypeOfSymbol(snapshotType).getProperties().map((p) => p.name), Object.keys(subscription.snapshot))

process.stdout.write(JSON.stringify(differences) + '\n')
process.exit(Object.keys(differences).length ? 1 : 0)
