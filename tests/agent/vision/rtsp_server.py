"""An RTSP camera for tests: JPEG frames of vtest.avi streamed as RTP/JPEG by GStreamer's RTSP server.

Run with Debian's own python3 (which has PyGObject and gst-rtsp-server from apt), as a separate
process, like a camera on the network: ``python3 rtsp_server.py PORT FRAME_DIR [USER PASSWORD]``.
With USER and PASSWORD the stream needs that login (RTSP basic authentication), as most IP cameras do.
"""

import sys

import gi

gi.require_version("Gst", "1.0")
gi.require_version("GstRtspServer", "1.0")
from gi.repository import GLib, Gst, GstRtspServer  # noqa: E402


def require_login(server, factory, user: str, password: str) -> None:
    """Only ``user`` with ``password`` may open the stream; anyone else gets 401 Unauthorized."""
    auth = GstRtspServer.RTSPAuth()
    token = GstRtspServer.RTSPToken()
    token.set_string(GstRtspServer.RTSP_TOKEN_MEDIA_FACTORY_ROLE, "viewer")
    auth.add_basic(GstRtspServer.RTSPAuth.make_basic(user, password), token)
    server.set_auth(auth)
    permissions = GstRtspServer.RTSPPermissions()
    permissions.add_permission_for_role("viewer", GstRtspServer.RTSP_PERM_MEDIA_FACTORY_ACCESS, True)
    permissions.add_permission_for_role("viewer", GstRtspServer.RTSP_PERM_MEDIA_FACTORY_CONSTRUCT, True)
    factory.set_permissions(permissions)


def main(port: str, frames: str, user: str | None = None, password: str | None = None) -> None:
    Gst.init(None)
    server = GstRtspServer.RTSPServer()
    server.set_address("127.0.0.1")
    server.set_service(port)
    factory = GstRtspServer.RTSPMediaFactory()
    factory.set_launch(
        f"( multifilesrc location={frames}/frame%05d.jpg loop=true "
        "caps=image/jpeg,framerate=10/1 ! jpegparse ! rtpjpegpay name=pay0 pt=26 )"
    )
    factory.set_shared(True)
    if user is not None:
        require_login(server, factory, user, password or "")
    server.get_mount_points().add_factory("/live", factory)
    server.attach(None)
    print("ready", flush=True)
    GLib.MainLoop().run()


if __name__ == "__main__":
    main(*sys.argv[1:5])
