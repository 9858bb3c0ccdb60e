"""`horse-jax settings [--method M]`: every setting of the methods' settings dataclasses (key, type,
default, meaning) and how the reference config files' run keys are handled."""

from __future__ import annotations


def register(sub) -> None:
  p = sub.add_parser("settings", help="list every editor setting (type, default, meaning) and the "
                                      "reference config keys that are mapped or ignored")
  p.add_argument("--method", default=None,
                 help="only the settings this method reads, with its defaults (an unknown method is "
                      "an error listing the registered ones)")
  p.set_defaults(func=run)


def run(args) -> int:
  from horse_jax import settings  # noqa: PLC0415  (imports the editors: only when the command runs)
  if args.method:
    settings.settings_class(args.method)  # UserError naming the registered methods
  print(settings.describe(args.method))
  print()
  print("| reference key | handling |\n|---|---|")
  for key, why in settings.RUN_KEYS.items():
    print(f"| `{key}` | {why} |")
  return 0
