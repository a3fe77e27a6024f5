"""A localhost server that speaks NDIF's protocol to nnsight 0.8's unmodified `RemoteBackend`.

`serve.py` is the server process (started with `python -I -S`, so interplab cannot be imported
there, as on NDIF); `app.py` its HTTP and websocket endpoints; `jobs.py` runs a request the way NDIF
does; `process.py` starts and stops it from the tests.
"""
