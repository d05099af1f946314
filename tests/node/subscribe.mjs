// A real, spec-following EventSource (the npm `eventsource` package) subscribing
// to one topic, driven by tests/test_node_client.py.
//
//   node subscribe.mjs URL TOPIC COUNT TIMEOUT_MS
//
// Prints one JSON object per line: {"type": "request", "lastEventId"} for every
// (re)connection the client makes on its own, "open", "error", and
// {"type": "event", "id", "lastEventId"} per message. Exits 0 after COUNT
// messages, 1 when TIMEOUT_MS passes first.
import { EventSource } from 'eventsource'

const [url, topic, count, timeoutMs] = process.argv.slice(2)
const print = (line) => process.stdout.write(JSON.stringify(line) + '\n')

let received = 0
const source = new EventSource(url, {
  // Only observes: records the Last-Event-ID the client itself decided to send.
  fetch: (input, init) => {
    print({ type: 'request', lastEventId: init.headers?.['Last-Event-ID'] ?? null })
    return fetch(input, init)
  },
})

source.addEventListener('open', () => print({ type: 'open' }))
source.addEventListener('error', (event) => print({ type: 'error', code: event.code ?? null, message: event.message ?? null }))
source.addEventListener(topic, (event) => {
  print({ type: 'event', id: JSON.parse(event.data).id, lastEventId: event.lastEventId })
  received += 1
  if (received >= Number(count)) finish(0)
})

const timer = setTimeout(() => finish(1), Number(timeoutMs))

function finish(code) {
  clearTimeout(timer)
  source.close()
  process.exit(code)
}
