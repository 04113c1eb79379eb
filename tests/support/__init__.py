"""Helpers shared by the tests, one job a module.

Starting real processes and servers:

- ``processes``: :class:`BackendServer` (our server under real gunicorn on a free port, a context
  manager), ``free_port``, ``wait_healthy``, ``stop_process_group``, ``serve_directory``;
- ``forced_backend``: the script BackendServer runs for forced answers; also runs the CLI with a
  forced engine (``serve [--net-guard]``, ``cli [--delay] -- ...``; fault rules from
  ``MOLMO_TEST_FAULTS``);
- ``labelstudio``: a real Label Studio 1.23.2 (own venv, headless) driven like a user (e2e tests);
- ``docker_stack``: docker-compose.yml's stack on a Docker engine (docker tests).

Fakes and controlled peers:

- ``http_fixtures``: a threaded HTTP server with scripted routes, and ``FakeLabelStudio``, Label
  Studio's auth over real HTTP;
- ``fake_label_studio``: an in-memory stand-in for label-studio-sdk's client object;
- ``tcp_proxy``: a TCP forwarder that can be taken down and brought back (an unreachable peer);
- ``net_guard``: keeps a process on loopback: test name table, refused connects, a record.

Engines and models:

- ``forcing``: logits processors that force chosen answers (and token probabilities) through
  the real ``generate()`` of the random demo model;
- ``scripted``: scripted engines (answers chosen per prompt) and task helpers for unit tests;
- ``molmo1_checkpoint``: writes a tiny Molmo v1 checkpoint (config, random weights, remote code);
- ``interleave``: the scheduler interleaving check shared by a test and a bench.

Reporting: ``fuzzing`` collects what the fuzz tests ran, for pytest's summary.
"""
