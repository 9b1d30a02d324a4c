"""The offline demo: procedural shapes with object masks, a small trained ResNet, and the fill-sensitivity demo."""
