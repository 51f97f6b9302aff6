"""The ServerApp Flower runs; the work is in `fl_app.server_loop`.

This module imports no torch. Flower's simulation loads the ServerApp on one thread while its
other thread loads the ClientApp and only then starts Ray; importing torch here held that
thread back (Ray started 2.1 s later, measured). Now the import happens inside the run, while
Ray starts.
"""

from __future__ import annotations

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    from fl_app import server_loop  # torch, hydra, the strategies: see the docstring

    server_loop.main(grid, context)
