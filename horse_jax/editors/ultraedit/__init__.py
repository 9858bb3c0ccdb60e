"""UltraEdit: lifelong, training-free editing (normalised value gradients, closed-form ridge solves).

  cfg = editor.config_for(settings, model)           settings: UltraEditSettings or a Resolved
  state = editor.init(cfg)                            empty statistics, zero shifts
  state = editor.edit(state, model, tokenizer, records, settings.editor, cfg)   batch after batch
  edited = editor.apply(model, state)                 base kernels + accumulated shifts

`settings` (the typed settings) imports no JAX program; `editor` holds the method.
"""
