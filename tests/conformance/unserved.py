"""Every operation of Cloud Hypervisor's OpenAPI file that podvmm does not serve must answer
501 (the path is right, the feature is missing), never 404 or another 5xx.

Usage: unserved.py SPEC BASE_URL SERVED_PATH...   (exits 1 listing the operations that did not)
"""
import sys
import urllib.error
import urllib.request

import yaml


def main():
    spec_path, base, served = sys.argv[1], sys.argv[2].rstrip("/"), set(sys.argv[3:])
    with open(spec_path) as f:
        spec = yaml.safe_load(f)
    bad, checked = [], 0
    for path, ops in spec["paths"].items():
        if path in served:
            continue
        for method in ops:
            if method not in ("get", "put", "post", "delete", "patch"):
                continue
            req = urllib.request.Request(base + path, method=method.upper(), data=b"{}",
                                         headers={"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(req, timeout=10) as r:
                    status = r.status
            except urllib.error.HTTPError as e:
                status = e.code
            checked += 1
            if status != 501:
                bad.append(f"{method.upper()} {path}: {status}")
    print(f"unserved operations checked: {checked}, not 501: {len(bad)}")
    for b in bad:
        print("  " + b)
    sys.exit(1 if bad or checked == 0 else 0)


if __name__ == "__main__":
    main()
