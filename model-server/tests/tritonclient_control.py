"""Drives the model server's repository control with tritonclient.grpc, as a Triton user would.

Usage:
  python tritonclient_control.py HOST:PORT load MODEL [CONFIG_JSON]
  python tritonclient_control.py HOST:PORT unload MODEL
  python tritonclient_control.py HOST:PORT index

Prints `ok` (and the index as JSON for `index`) and exits 0 on success; on an error from the server prints
`error: <message>` and exits 2.
"""
import json
import sys

import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException


def main():
    url, action = sys.argv[1], sys.argv[2]
    client = grpcclient.InferenceServerClient(url=url)
    try:
        if action == "load":
            config = sys.argv[4] if len(sys.argv) > 4 else None
            client.load_model(sys.argv[3], config=config)
            print("ok")
        elif action == "unload":
            client.unload_model(sys.argv[3])
            print("ok")
        elif action == "index":
            index = client.get_model_repository_index(as_json=True)
            print("ok")
            print(json.dumps(index.get("models", [])))
        else:
            raise SystemExit(f"unknown action {action}")
    except InferenceServerException as e:
        print(f"error: {e}")
        sys.exit(2)


if __name__ == "__main__":
    main()
