"""Backend "torch": pure PyTorch, everywhere -- the reference every other backend is tested
against, and the fallback. One file per op; fastkd/backends.py registers each file's function of
the op's name as the op `<op>_torch`."""
