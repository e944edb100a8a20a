"""The benchmark harnesses: this project's agents and the Debian peers side by side.

One module per harness, each run as a module from the repository root:

    python3 -m bench.harness.sni            # sni-proxy vs direct, HAProxy, nginx stream, sniproxy
    python3 -m bench.harness.dns            # node-local-dns vs unbound, pdns-recursor, knot-resolver, dnsmasq
    python3 -m bench.harness.dns_fastpath   # node-local-dns's XDP/tc fast path (needs root)

`common` holds what they share (processes, /proc accounting, rounds, report pieces, set-up);
`tests/` the unit tests of the rounds and the derived figures
(`python3 -m unittest discover -s bench/harness -t .`). bench/README.md has the method.
"""
