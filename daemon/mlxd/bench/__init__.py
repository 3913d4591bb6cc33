"""``bin/bench``: mlxd and ``mlx_lm.server`` side by side on the same model and workload.

Both servers are started as subprocesses on free loopback ports (mlxd with a temporary config
and state directory; the reference with the same weights, exported from a GGUF with
``mlxd export-model`` when needed, and its default settings), then driven over HTTP with the
same streaming Chat Completions requests at temperature 0. Every request starts with a tag
that differs per suite, repeat and stream, so no measurement is a prompt-cache hit of an
earlier one (except the growing conversation, where reuse is the point); both servers get
exactly the same request bodies, interleaved repeat by repeat so that background load hits
both alike. Finally an in-process ``mlx_lm.stream_generate`` run, in its own subprocess with
mlxd's BLAS and model loading, shows how much the HTTP server costs.

Output: one JSON line per measurement on stdout (``server``, ``metric``, ``value`` = median
over ``--repeats``, ``min``, ``max``, ``unit`` and the parameters), ``setup`` lines that say
what each side ran with (BLAS, dtype, flags), a ratio table (mlxd / mlx_lm.server) on stderr
(stdout with ``--table``), and with ``--out`` everything as one JSON document.

The package needs only the standard library (plus mlxd itself); it never imports mlx except
inside the in-process worker subprocess, after choosing the BLAS. Its modules, in the order
a run uses them: ``cli`` (arguments, the run), ``harness`` (start, wait for, stop a server;
shared with the e2e tests and ``bin/gpu_bench.py``), ``workload`` (prompts, sizes),
``client`` (streamed requests and their timings), ``scenarios`` (the suites), ``setupinfo``
(what each side ran with), ``inprocess`` (the in-process reference), ``results`` (JSON lines,
ratio table).
"""
