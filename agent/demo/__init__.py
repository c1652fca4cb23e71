"""The demo and its throwaway parts (a local mosquitto, a whole site in a directory), also used by
tests and benchmarks. Nothing on a device or at the centre imports it."""
