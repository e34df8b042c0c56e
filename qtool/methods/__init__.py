"""Method tables of the stages that offer several methods, one module per stage: ``transform`` and ``quantize``.

Each table maps a recipe config class (its ``method:`` literal is the recipe tag) to the handler that carries the
method's facts and does its work (``qtool.methods.base``). The recipe's discriminated unions are built from the
tables' keys, and the stages dispatch through them: no code outside a table branches on a method name.
"""
