#!/usr/bin/env python3
"""Grows Synthea's bulk NDJSON sample into a larger set of the same shape, for the import
benchmark: COPIES copies of every line, each copy with fresh ids and identifier values and
every reference rewritten to match, so each copy is a distinct, valid population whose
references (literal and by identifier) resolve inside that copy.

usage: grow_synthea.py SOURCE_DIR OUT_DIR COPIES
"""

import json
import os
import re
import sys
import uuid

# The namespace of the copies' ids: uuid5(namespace, f"{copy}:{original id}").
NAMESPACE = uuid.UUID("6f1d0c2e-8a52-4b8e-9a47-2f6a3c1b5d90")


def main() -> None:
    source, out, copies = sys.argv[1], sys.argv[2], int(sys.argv[3])
    files = sorted(f for f in os.listdir(source) if f.endswith(".ndjson"))
    texts = {f: open(os.path.join(source, f), encoding="utf-8").read().splitlines() for f in files}
    ids, values = set(), set()
    for lines in texts.values():
        for line in lines:
            if not line.strip():
                continue
            resource = json.loads(line)
            ids.add(resource["id"])
            for identifier in resource.get("identifier", []):
                if "value" in identifier:
                    values.add(identifier["value"])
    # One pass of one regular expression per line: every id and identifier value, longest
    # first so that no value is replaced inside a longer one.
    tokens = sorted(ids | values, key=len, reverse=True)
    pattern = re.compile("|".join(re.escape(t) for t in tokens))
    os.makedirs(out, exist_ok=True)
    written = 0
    for name in files:
        with open(os.path.join(out, name), "w", encoding="utf-8") as target:
            for copy in range(copies):
                def replace(match: re.Match) -> str:
                    token = match.group(0)
                    if token in ids:
                        return str(uuid.uuid5(NAMESPACE, f"{copy}:{token}"))
                    return f"{token}-{copy}"

                for line in texts[name]:
                    if line.strip():
                        target.write(pattern.sub(replace, line))
                        target.write("\n")
                        written += 1
    print(f"{written} resources in {len(files)} files under {out}")


if __name__ == "__main__":
    main()
