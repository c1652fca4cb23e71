"""On-device vision for camera boxes: detection, motion gating, tracking, rules, evidence.

Imported only when a device has a ``[camera]`` section: a call point never
loads numpy, OpenCV or an interpreter.
"""
