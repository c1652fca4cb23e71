"""Hardware access only: GPIO devices over gpiozero and camera backends.

Nothing here imports ``agent``; vendor libraries are imported lazily inside
the backend that needs them, so this package imports on any machine.
"""
