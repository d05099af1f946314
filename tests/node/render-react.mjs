// Renders a React component that uses useRealtime (static/react.js) into a DOM (happy-dom)
// against a live server, as a page at BASE_URL would; driven by tests/test_react.py.
//
//   node render-react.mjs BASE_URL COMPONENT.jsx EXPORT
//
// Reads commands on stdin, one JSON object a line: {"render": PROPS} renders the component, in
// StrictMode, with PROPS (again: re-renders it); {"unmount": true} unmounts it.
// Prints one JSON object a line: {"type": "dom", ...} each time the rendered DOM changes (what
// the README's component shows: progress, run, connection, log), {"type": "unmounted"}, and
// {"type": "console", level, text} for anything React reports there: its development build
// warns of misuse, e.g. a getSnapshot result that is not cached.
import { register } from 'node:module'
import { createInterface } from 'node:readline'
import { EventSource } from 'eventsource'
import { Window } from 'happy-dom'

const [base, componentPath, exportName] = process.argv.slice(2)
const print = (line) => process.stdout.write(JSON.stringify(line) + '\n')

for (const level of ['error', 'warn']) {
  console[level] = (...args) => print({ type: 'console', level, text: args.map(String).join(' ') })
}
process.on('unhandledRejection', (reason) => print({ type: 'console', level: 'unhandledRejection', text: String(reason?.stack ?? reason) }))

// The page: relative URLs ("/api/realtime/token", the stream) resolve against BASE_URL.
const window = new Window({ url: base })
globalThis.window = window
globalThis.document = window.document
globalThis.navigator ??= window.navigator // node 21+ has its own; react-dom reads userAgent
globalThis.EventSource = EventSource // the npm package resolves relative URLs against document.baseURI
const nodeFetch = globalThis.fetch
globalThis.fetch = (input, init) => nodeFetch(new URL(input, document.baseURI), init)

register('./hooks.mjs', import.meta.url)
const { createElement, StrictMode } = await import('react')
const { createRoot } = await import('react-dom/client')
const Component = (await import(componentPath))[exportName]

const container = document.createElement('div')
document.body.appendChild(container)
let shown = null
new window.MutationObserver(() => {
  const text = (selector) => container.querySelector(selector)?.textContent ?? null
  const line = JSON.stringify({
    type: 'dom',
    progress: container.querySelector('progress')?.getAttribute('value') ?? null,
    run: text('.run'),
    connection: text('.connection'),
    log: [...container.querySelectorAll('li')].map((item) => item.textContent),
  })
  if (line !== shown) process.stdout.write((shown = line) + '\n')
}).observe(container, { subtree: true, childList: true, characterData: true, attributes: true })

const root = createRoot(container)
for await (const command of createInterface({ input: process.stdin })) {
  const { render, unmount } = JSON.parse(command)
  if (render) root.render(createElement(StrictMode, null, createElement(Component, render)))
  if (unmount) {
    root.unmount()
    print({ type: 'unmounted' })
  }
}
await window.happyDOM.close()
process.exit(0)
