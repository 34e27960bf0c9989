"""The soak's sections, one module each: a function ``World -> Part`` and its helpers."""
