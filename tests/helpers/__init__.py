"""Set-up code shared by the test modules, imported as ``helpers.<module>`` (``tests/``
is on ``sys.path`` as for ``pki_helpers`` and ``peers``: pytest puts the rootdir-less
``tests/`` folder there, and ``bench/`` inserts it itself).

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
