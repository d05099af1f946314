// Module hooks (node's module.register) that let node load the browser modules as a page would:
//   - "/static/..." is the repo's static/ folder, as the server serves it;
//   - bare specifiers ("react", "react/jsx-runtime") resolve from tests/node, wherever the
//     importing file lives (static/react.js leaves "react" to the user's bundler or import map);
//   - a .jsx file (the README's component) is compiled with TypeScript's transpiler.
import { readFile } from 'node:fs/promises'
import ts from 'typescript'

const STATIC = new URL('../../static/', import.meta.url)

export async function resolve(specifier, context, nextResolve) {
  if (specifier.startsWith('/static/')) {
    return { url: new URL(specifier.slice('/static/'.length), STATIC).href, shortCircuit: true }
  }
  const bare = !/^[./]/.test(specifier) && !specifier.includes(':')
  return nextResolve(specifier, bare ? { ...context, parentURL: import.meta.url } : context)
}

export async function load(url, context, nextLoad) {
  if (!url.endsWith('.jsx')) return nextLoad(url, context)
  const { outputText } = ts.transpileModule(await readFile(new URL(url), 'utf8'), {
    fileName: url,
    compilerOptions: { jsx: ts.JsxEmit.ReactJSX, module: ts.ModuleKind.ESNext, target: ts.ScriptTarget.ES2022 },
  })
  return { format: 'module', source: outputText, shortCircuit: true }
}
