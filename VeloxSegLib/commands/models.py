"""``veloxseg models``: list the embedded bundles and those in the user models folder."""
from __future__ import annotations

import json


def register(subparsers):
    p = subparsers.add_parser(
        "models",
        help="list the available model bundles",
        description=(
            "List the model bundles shipped with VeloxSeg (embedded) and those in the user models folder "
            "($VELOXSEG_MODELS, default ~/.veloxseg/models). A bundle that fails to load is listed with its "
            "error. Any listed name can be given to 'veloxseg predict -m NAME'. When several bundles have "
            "the same name, -m NAME picks a user bundle before an embedded one (by bundle.json name, then by "
            "folder/zip name); the others are marked '(shadowed by PATH)' (--json: 'shadowed_by'). A user "
            "bundle whose folder/zip name is NAME but that does not load makes -m NAME an error naming it, "
            "never a fallback to the embedded bundle."),
    )
    p.add_argument("--json", action="store_true", help="print the list as JSON")
    p.set_defaults(func=run)
    return p


def _table(entries) -> str:
    header = ("NAME", "SOURCE", "MODEL", "CHANNELS", "LABELS", "PATH", "DESCRIPTION")
    rows = []
    for e in entries:
        if "error" in e:
            rows.append((e["name"], e["source"], "-", "-", "-", e["path"], f"ERROR: {e['error']}"))
            continue
        labels = [n for n in e["labels"][1:]]  # label 0 is background
        desc = " ".join(str(e["description"]).split())
        if len(desc) > 60:
            desc = desc[:57] + "..."
        if e.get("shadowed_by"):
            desc = f"(shadowed by {e['shadowed_by']}) {desc}".rstrip()
        rows.append((e["name"], e["source"], e["model"], ",".join(e["channels"]), ",".join(labels), e["path"],
                     desc))
    widths = [max(len(str(r[i])) for r in [header] + rows) for i in range(len(header) - 1)]
    lines = []
    for r in [header] + rows:
        lines.append("  ".join([str(x).ljust(w) for x, w in zip(r[:-1], widths)] + [str(r[-1])]).rstrip())
    return "\n".join(lines)


def run(args) -> int:
    from ..bundle import MODELS_ENV, embedded_bundles_dir, list_bundles, user_models_dir

    entries = list_bundles()
    if args.json:
        print(json.dumps({"embedded_dir": str(embedded_bundles_dir()), "user_dir": str(user_models_dir()),
                          "bundles": entries}, indent=2))
        return 0
    if entries:
        print(_table(entries))
    else:
        print("No model bundles found.")
    print(f"\nUser models folder: {user_models_dir()} (set {MODELS_ENV} to change)")
    return 0
