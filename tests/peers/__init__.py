"""Throw-away real peer servers (Dovecot, ...) that tests drive as upstreams."""
