// static/realtime.js's text streams fed by a real, spec-following EventSource (the npm
// `eventsource` package), driven by tests/test_text_streams_live.py.
//
//   node texts.mjs BASE_URL CHANNEL TOKEN TIMEOUT_MS
//
// Prints one JSON object per line: {"type": "request", "lastEventId"} for every (re)connection
// the EventSource makes on its own, "open" each time the subscription opens, {"type": "text",
// "length"} per text change, and {"type": "final", "text", "status"} once a text stream ended.
// Exits 0 then, 1 when TIMEOUT_MS passes first.
import { EventSource } from 'eventsource'
import { subscribe } from '../../static/realtime.js'

const [base, channel, token, timeoutMs] = process.argv.slice(2)
const print = (line) => process.stdout.write(JSON.stringify(line) + '\n')

class ObservedEventSource extends EventSource {
  constructor(url, init) {
    super(new URL(url, base), {
      ...init,
      // Only observes: records the Last-Event-ID the client itself decided to send.
      fetch: (input, options) => {
        print({ type: 'request', lastEventId: options.headers?.['Last-Event-ID'] ?? null })
        return fetch(input, options)
      },
    })
  }
}

const sub = subscribe({
  channel,
  topics: ['answer'],
  token,
  pauseWhenHidden: false,
  env: { EventSource: ObservedEventSource, fetch: (url, options) => fetch(new URL(url, base), options) },
})
let wasOpen = false
sub.onChange((change) => {
  if (sub.state === 'open' && !wasOpen) print({ type: 'open' })
  wasOpen = sub.state === 'open'
  if (change.type !== 'text') return
  const stream = sub.texts[change.sid]
  print({ type: 'text', length: stream.text.length })
  if (stream.status !== 'streaming') {
    print({ type: 'final', text: stream.text, status: stream.status })
    finish(0)
  }
})

const timer = setTimeout(() => finish(1), Number(timeoutMs))

function finish(code) {
  clearTimeout(timer)
  sub.close()
  process.exit(code)
}
