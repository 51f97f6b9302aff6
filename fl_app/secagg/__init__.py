"""Secure aggregation (SecAgg+) for fl_app's Message-API rounds: the server learns only the sum.

protocol.py: what both sides speak (message type, stages, record names, settings record);
settings.py: the `secagg` config group, its checks and the per-round share plan;
vectors.py: quantizing, masking and decoding the vectors that are summed;
client.py: the client's protocol stages (its secrets live in the node's Context.state);
server.py: the server's four stages over the grid, ending in the unmasked sum;
replies.py: what the server accepts from each stage's reply (a malformed one is a dropout);
round.py: a round's train stage with secure aggregation, handing the sum to the strategy.
"""
