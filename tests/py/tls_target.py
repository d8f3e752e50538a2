#!/usr/bin/env python3
"""A TLS 1.3 target server on the OpenSSL that the `cryptography` wheel bundles (3.5 or
later: X25519MLKEM768 is among its default groups), through pyOpenSSL.

    tls_target.py PORT CERT KEY CLIENT_CA

It asks for a client certificate chaining to CLIENT_CA, and answers each connection with a
small HTTP/1.0 page naming the client's subject and the group OpenSSL negotiated (for the
reader of a failure; the tests take the group from the wire, not from here). The first
line on stdout is "listening PORT" once it accepts.
"""
import socket
import sys

from OpenSSL import SSL


def main() -> None:
    port, cert, key, client_ca = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
    ctx = SSL.Context(SSL.TLS_METHOD)
    ctx.set_min_proto_version(SSL.TLS1_3_VERSION)
    ctx.use_certificate_chain_file(cert)
    ctx.use_privatekey_file(key)
    ctx.load_verify_locations(client_ca)
    ctx.set_verify(SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT, lambda *a: a[-1])
    lsock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    lsock.bind(("127.0.0.1", port))
    lsock.listen(16)
    print(f"listening {port}", flush=True)
    while True:
        raw, _ = lsock.accept()
        raw.settimeout(None)
        conn = SSL.Connection(ctx, raw)
        conn.set_accept_state()
        try:
            conn.do_handshake()
            conn.recv(4096)
            peer = conn.get_peer_certificate()
            subject = peer.get_subject().CN if peer else "-"
            group = conn.get_group_name() if hasattr(conn, "get_group_name") else "?"
            body = f"client {subject} group {group}\n".encode()
            conn.sendall(
                b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\nContent-Length: "
                + str(len(body)).encode()
                + b"\r\n\r\n"
                + body
            )
            conn.shutdown()
        except (SSL.Error, OSError) as e:
            print(f"connection failed: {e}", file=sys.stderr, flush=True)
        finally:
            raw.close()


if __name__ == "__main__":
    main()
