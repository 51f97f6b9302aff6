"""All of fl_app's differential privacy, one concept per module:

central.py: DPNoise, user-level central DP around an fl_app strategy (clip, noise, Poisson
sampling, the secure-sum release); noise.py: the Gaussian noise and its generator (never
checkpointed); clipping.py: updates brought within the clip norm; adaptive_clipping.py: the
clip norm that follows a quantile; accounting.py: epsilon from the RDP and PLD accountants (the
tighter counts) and the budget stop; settings.py: every DP setting's check, written once;
noise_warning.py: the one-line warning when the noise will swamp the signal; client.py:
client-side DP (local DP and DP-SGD) and each client's own accountant.

Nothing is imported here: a client process imports client.py without the server's modules.
"""
