"""Network infrastructure under the front ends, with no policy in it.

``socket_transport`` is mailward's asyncio transport (OpenSSL on the socket, see its
docstring for why it is hand-written) and ``listener`` its accept loop; ``tls`` builds
the TLS contexts for listeners and upstream connections and reads a connection's device
certificate.
"""
