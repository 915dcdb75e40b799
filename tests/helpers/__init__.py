"""Set-up code shared by the test modules, imported as ``helpers.<module>``: ``tests/``
has no ``__init__.py``, so pytest's default ``prepend`` import mode puts it on
``sys.path`` when it loads ``tests/conftest.py`` (as for ``pki_helpers``,
``audit_records`` and ``peers``); the ``bench/`` scripts insert it themselves.

- :mod:`helpers.fakes`: in-process stand-ins for the gate's collaborators (an audit
  sink that keeps its records, a live session that remembers its goodbye);
- :mod:`helpers.tls`: a trial deployment's certificates on disk with enrolled devices
  (``Pki``) and the TLS client context a phone builds from them;
- :mod:`helpers.frontend_env`: the real gate, posture store and audit log in a
  temporary folder, with a front end's listeners started on them (``FrontendEnv``);
- :mod:`helpers.playbook`: ``play`` for the sans-IO pre-auth layers, and the gate's
  answers the playbooks give them;
- :mod:`helpers.wire`: ``drain`` for the sans-IO wire parsers;
- :mod:`helpers.serve`: the console script, ``mailward serve`` as a child process,
  waiting for it to be ready, free loopback ports.
"""
