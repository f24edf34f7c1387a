"""World models behind one protocol, `predict(s1, actions) -> states`.

The model families (Actions World Models, History World Models, Markov one-step
models) are not built yet; every `diffenvs` task already satisfies the protocol.
"""
