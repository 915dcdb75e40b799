"""Set-up code shared by the test modules, imported as ``helpers.<module>`` (``tests/``
is on ``sys.path`` as for ``pki_helpers`` and ``peers``: pytest puts the rootdir-less
``tests/`` folder there, and ``bench/`` inserts it itself).

- :mod:`helpers.fakes`: in-process stand-ins for the gate's collaborators (an audit
  sink that keeps its records, a live session that remembers its goodbye);
- :mod:`helpers.tls`: a trial deployment's certificates on disk with enrolled devices
  (``Pki``) and the TLS client context a phone builds from them.
"""
