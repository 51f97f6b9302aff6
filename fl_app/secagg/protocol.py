"""The SecAgg+ protocol as both sides speak it: the message type, the four stages, the record and
metric names, the settings a setup message carries, and the byte sizes of the shared secrets.

The client's stages (client.py) and the server's (server.py, replies.py) import these from here,
so the server never imports the client's code.
"""

from __future__ import annotations

from cryptography.hazmat.primitives.asymmetric import ec
from flwr.app import ConfigRecord
from flwr.supercore.primitives.asymmetric import bytes_to_public_key, public_key_to_bytes

from fl_app.secagg.settings import SecAggSettings

ACTION = "secagg"  # the ClientApp's @app.train(ACTION) handler ...
MESSAGE_TYPE = f"train.{ACTION}"  # ... answers messages of this type
# The stages, in order; a client refuses a stage that does not follow the one before it.
SETUP, SHARE_KEYS, COLLECT, UNMASK = "setup", "share-keys", "collect", "unmask"
STAGES = (SETUP, SHARE_KEYS, COLLECT, UNMASK)
REQUEST = "secagg"      # the ConfigRecord every stage message (and reply) carries
# Two exchanges per round in steady state: a collect or unmask message of round r may carry, in
# this second ConfigRecord, the next round's (r + 1) setup or share-keys stage; its reply
# answers it in a record of the same name. Only these pairs ride together (collect cannot merge
# with unmask: round r + 1 trains on round r's unmasked model).
NEXT = "secagg-next"
PIGGYBACK = {COLLECT: SETUP, UNMASK: SHARE_KEYS}
MASKED = "masked"       # the ArrayRecord of a collect reply
# A share-keys reply's commitment to the private mask seed b: SHA-256(b). It lets the server
# tell a b rebuilt from an altered share from the real one (b is 120 random bits: the hash
# reveals nothing of it).
SEED_HASH = "seed-hash"
# The only client metrics sent in the clear: privacy settings every client shares, and local
# DP's epsilon, a function of those settings and of the rounds the server itself sent the
# client. All others, DP-SGD's epsilon included (it depends on the client's example count),
# are in the secure sum. docs/privacy.md lists them as what the server learns per client.
PUBLIC_METRICS = frozenset({
    "local_epsilon", "local_delta", "local_noise_multiplier", "local_clip_norm",
    "dpsgd_delta", "dpsgd_noise_multiplier", "dpsgd_max_grad_norm"})
# The private mask seed (vectors.prg): 15 random bytes (120 bits) pad to one Shamir block, so
# sharing it and rebuilding it cost half of what a 16- or 32-byte seed does.
SEED_BYTES = 15
# The private scalar of a key on the curve of Flower's generate_key_pairs (P-384): what is
# Shamir-shared of sk1 (private_scalar).
SCALAR_BYTES = (ec.SECP384R1.key_size + 7) // 8
DP_CLIPPED = "secagg-dp-clipped"  # a metric: 1 if central DP's clipping scaled the update
# A collect request's distributed DP settings (secagg.noise=distributed): each client adds its
# share of the noise (fl_app.privacy.distributed) and derives the rest itself.
NOISE_MULTIPLIER = "noise-multiplier"  # z: the noise of t survivors has std z * Delta_2
COHORT = "cohort"                # clients that may be in the sum (sizes the scale: no wrap)
ROTATION_SEED = "rotation-seed"  # fresh public randomness of the round's rotation
# A SuperNode's own floor (--node-config "min-noise-multiplier=1.0"): below it, or without
# distributed noise, the node refuses to send its update.
NOISE_FLOOR = "min-noise-multiplier"
SETTINGS = ("num_shares", "reconstruction_threshold", "clipping_range", "quantization_range",
             "modulus_range", "max_weight")


def config_record(values: dict) -> ConfigRecord:
    """A ConfigRecord of `values` without its empty lists (Flower cannot size those); readers
    take a missing list as empty."""
    return ConfigRecord({k: v for k, v in values.items() if not (isinstance(v, list) and not v)})


def settings_record(s: SecAggSettings, shares: int, threshold: int) -> dict:
    """The settings the setup message carries (this round's k and t resolved)."""
    return {"num_shares": shares, "reconstruction_threshold": threshold,
            "clipping_range": float(s.clipping_range), "quantization_range": s.quantization_range,
            "modulus_range": s.modulus_range, "max_weight": float(s.max_weight)}


def key_from_scalar(scalar: bytes, public_key: bytes) -> ec.EllipticCurvePrivateKey:
    """The private key of `scalar` on the curve of `public_key`; ValueError if it is not the
    private half of `public_key` (a share was altered)."""
    curve = bytes_to_public_key(public_key).curve
    key = ec.derive_private_key(int.from_bytes(scalar, "big"), curve)
    if public_key_to_bytes(key.public_key()) != public_key:
        raise ValueError("the rebuilt key does not match its public key")
    return key
