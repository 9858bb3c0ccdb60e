"""`horse-jax settings [--method M]`: the declared settings (key, type, default, meaning) and how the
reference config files' run keys are handled."""

from __future__ import annotations


def register(sub) -> None:
  p = sub.add_parser("settings", help="list every editor setting (type, default, meaning) and the "
                                      "reference config keys that are mapped or ignored")
  p.add_argument("--method", default=None, choices=("horse", "malmen", "mend", "horen", "grace"),
                 help="only the settings this method reads, with its defaults")
  p.set_defaults(func=run)


def run(args) -> int:
  from horse_jax import settings  # noqa: PLC0415
  print(settings.describe(args.method))
  print()
  print("| reference key | handling |\n|---|---|")
  for key, why in settings.RUN_KEYS.items():
    print(f"| `{key}` | {why} |")
  return 0
