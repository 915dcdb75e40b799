"""``mailward demo`` (:mod:`proxy.demo.run`) and the small embedded mail server it runs
in front of (:mod:`proxy.demo.upstream`), which the server tests use too. Neither is
part of the proxy: nothing outside this package and the tests imports them.
"""
