"""What realtime/, jobs/ and demo/ share, and nothing else.

`errors` (the root `AppError`, every error as docs/protocol.md §3 JSON), `database` (one
engine per app, write transactions), `request_input` (strict JSON bodies and
bearer keys), `jsontext` (the one JSON encoder for stored data), `greenlets`
(is gevent patching this process?), `config` (settings read from text),
`postgres` (the statement timeout behind a pooler, refusals that retrying will
not fix) and `server_errors` (gunicorn's own error answers as JSON).
"""
