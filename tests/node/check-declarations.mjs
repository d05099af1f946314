// What tsc cannot see: do the declarations name what the modules really export, and do
// RealtimeSnapshot, TextStreamState and the "text" changes list the real objects' fields? Run by
// tests/test_react.py; prints the differences as JSON and exits 1 when there are any.
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
const declaredType = (name) => checker.getDeclaredTypeOfSymbol(declared('realtime.d.ts').find((symbol) => symbol.name === name))
const names = (type) => type.getProperties().map((p) => p.name)
compare('RealtimeSnapshot', names(declaredType('RealtimeSnapshot')), Object.keys(subscription.snapshot))

// A text stream's state and its changes, from one stream fed to a stand-in EventSource.
class OneStream {
  constructor() {
    OneStream.last = this
  }
  addEventListener(type, listener) {
    if (type === 't') this.deliver = listener
  }
  close() {}
}
const fed = subscribe({ channel: 'c', topics: ['t'], token: 't', env: { ...idle, EventSource: OneStream } })
const textChanges = []
fed.onChange((change) => change.type === 'text' && textChanges.push(change))
const frames = [{ seq: 0, text: '' }, { seq: 1, delta: 'Hi' }, { seq: 2, delta: '', status: 'failed', error: 'TimeoutError' }]
frames.forEach((data, id) => {
  const envelope = { id: id + 1, channel: 'c', topic: 't', data: { text_stream: 's', ...data }, run_id: null, created_at: '' }
  OneStream.last.deliver({ type: 't', data: JSON.stringify(envelope), lastEventId: `e-${id + 1}` })
})
fed.close()
compare('TextStreamState', names(declaredType('TextStreamState')), Object.keys(fed.texts.s))
const textVariants = declaredType('RealtimeChange').types.filter((variant) => {
  const type = variant.getProperty('type')
  return checker.typeToString(checker.getTypeOfSymbolAtLocation(type, type.valueDeclaration)) === '"text"'
})
for (const [i, change] of textChanges.entries()) {
  compare(`RealtimeChange "text" (${change.replaced ? 'replaced' : 'appended'}, change ${i})`, [...new Set(textVariants.flatMap(names))], Object.keys(change))
}

// Several channels: a channel's view, and the "channel" change.
const hub = subscribe({ channels: {}, token: () => 't', env: idle })
const hubChanges = []
hub.onChange((change) => change.type === 'channel' && hubChanges.push(change))
hub.add('c', ['t'])
hub.close()
compare('ChannelView', names(declaredType('ChannelView')), Object.keys(hub.channels.c))
const channelVariant = declaredType('RealtimeChange').types.find((variant) => {
  const type = variant.getProperty('type')
  return checker.typeToString(checker.getTypeOfSymbolAtLocation(type, type.valueDeclaration)) === '"channel"'
})
compare('RealtimeChange "channel"', names(channelVariant), Object.keys(hubChanges[0]))

process.stdout.write(JSON.stringify(differences) + '\n')
process.exit(Object.keys(differences).length ? 1 : 0)
