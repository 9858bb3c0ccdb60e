"""`--config` and `--set` of the editing commands (edit, train): one or more values per flag."""

from __future__ import annotations


def add_settings_args(p, example: str) -> None:
  """Adds --config FILE [FILE ...] and --set KEY=VALUE [KEY=VALUE ...] (both repeatable)."""
  p.add_argument("--config", nargs="+", action="extend", default=[], metavar="FILE",
                 help="settings files, applied in order: this project's nested YAML, a HoReN/EasyEdit "
                      "hparams file (flat keys, inner_params), or a HORSE hydra group "
                      "(editor/*.yaml, model/*.yaml, data/*.yaml) or hydra root config.yaml")
  p.add_argument("--set", dest="overrides", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                 help=f"override settings (after --config), e.g. --set {example}; an unknown key is "
                      "an error naming the closest valid one")
