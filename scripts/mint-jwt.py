#!/usr/bin/env python3
"""Mints an HS256 JWT for trying a JWT-protected route (demo and tests only).

    scripts/mint-jwt.py --secret-env SWITCHYARD_DEMO_JWT_SECRET --sub alice --scope "orders:read"

The secret must match the provider's HMAC key (`secret_env` / `secret_file` in its document).
Standard library only.
"""
import argparse
import base64
import hashlib
import hmac
import json
import os
import sys
import time


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--secret-env", help="environment variable holding the HMAC secret")
    src.add_argument("--secret-file", help="file holding the HMAC secret")
    p.add_argument("--sub", default="demo-user")
    p.add_argument("--iss", default="https://id.switchyard.dev")
    p.add_argument("--aud", default="demo")
    p.add_argument("--scope", default="", help="space-delimited scopes")
    p.add_argument("--kid", default="demo")
    p.add_argument("--ttl", type=int, default=3600, help="lifetime in seconds")
    a = p.parse_args()
    if a.secret_env:
        secret = os.environ.get(a.secret_env)
        if not secret:
            print(f"environment variable {a.secret_env} is empty", file=sys.stderr)
            return 2
        key = secret.encode()
    else:
        with open(a.secret_file, "rb") as f:
            key = f.read().strip()
    now = int(time.time())
    header = {"alg": "HS256", "typ": "JWT", "kid": a.kid}
    claims = {"sub": a.sub, "iss": a.iss, "aud": a.aud, "iat": now, "nbf": now, "exp": now + a.ttl}
    if a.scope:
        claims["scope"] = a.scope
    signing_input = b64url(json.dumps(header, separators=(",", ":")).encode()) + "." + \
        b64url(json.dumps(claims, separators=(",", ":")).encode())
    sig = hmac.new(key, signing_input.encode(), hashlib.sha256).digest()
    print(signing_input + "." + b64url(sig))
    return 0


if __name__ == "__main__":
    sys.exit(main())
