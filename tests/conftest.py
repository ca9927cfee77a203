"""Eight simulated CPU devices for every test, so the cross-device protocol runs for real."""

import jax

jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_enable_x64", False)
