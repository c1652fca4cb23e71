"""What travels between a device and the centre: claims, topics, signatures, sealed evidence,
enrolment records. Used by both sides; imports neither, and does no I/O beyond reading keys."""
