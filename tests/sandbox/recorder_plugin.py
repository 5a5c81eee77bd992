"""A CNI plugin for the sandbox's tests: records each call, then passes prevResult through.

Each call appends one JSON line (command, CNI_* env, stdin config) to $RECORD_FILE's path, read
from the `record` field of its config; ADD prints prevResult as its result, DEL prints nothing.
With `"fail": "<message>"` in its config, ADD fails with that message (code 999); with
`"failDelWhile": "<path>"`, DEL fails (code 999) while that file exists.
"""

from __future__ import annotations

import json
import os
import sys


def main() -> int:
    conf = json.load(sys.stdin)
    command = os.environ.get("CNI_COMMAND", "")
    call = {
        "command": command,
        "env": {k: v for k, v in os.environ.items() if k.startswith("CNI_")},
        "conf": conf,
    }
    with open(conf["record"], "a") as f:
        f.write(json.dumps(call) + "\n")
    if command == "ADD":
        if conf.get("fail"):
            json.dump(
                {"cniVersion": conf["cniVersion"], "code": 999, "msg": conf["fail"]}, sys.stdout
            )
            return 1
        json.dump(conf.get("prevResult", {"cniVersion": conf["cniVersion"]}), sys.stdout)
    if command == "DEL" and conf.get("failDelWhile") and os.path.exists(conf["failDelWhile"]):
        json.dump({"cniVersion": conf["cniVersion"], "code": 999, "msg": "DEL refused"}, sys.stdout)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
