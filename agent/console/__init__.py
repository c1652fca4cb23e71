"""The supervision centre's web console: the alert queue, handling, the fleet; beside the receiver."""
