"""``make soak``: a bounded fault run against real worker processes (see :mod:`soak.run`).

Where the code lives: :mod:`soak.run` (the entry: arguments, section order), :mod:`soak.world`
(Config, Part, World and the lines every section writes), :mod:`soak.load` (the inference
load), :mod:`soak.harness` (one section's workers, BE and journal), :mod:`soak.sections`
(one module a section), :mod:`soak.corpus` (the hostile messages),
:mod:`soak.payloads` (the hostile objects they point at) and :mod:`soak.report`
(docs/RELIABILITY.md and the JSON result)."""
