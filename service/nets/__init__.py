"""The networks, each in a module that imports only torch: training builds and fits them, the service loads them.

Each module has the ``nn.Module`` and ``build(hyperparameters)``, which rebuilds the net from the keys a
manifest's hyperparameters hold (nanoGPT's habit: the checkpoint carries what rebuilds its model).
"""
