"""A lying SFTP server for the fault-matrix tests (Debian's python3-paramiko).

Serves a real directory (argv[1]) as "/" to any client that offers any public
key, with the host key argv[2] (an OpenSSH private key file), on 127.0.0.1 at
the port it writes to argv[3] once listening. It lies: every directory listing
also holds the entries in LIES (parent references, absolute names, names with
"/" and NUL), and any path naming one of them stats and reads as a small file
of HOSTILE bytes. Writing through a lie is refused. It exits when its parent
closes its standard input.
"""

import errno
import os
import socket
import sys
import threading

import paramiko
from paramiko import SFTPAttributes, SFTPHandle, SFTPServer, SFTPServerInterface
from paramiko.sftp import SFTP_OK

HOSTILE = b"hostile bytes: a client wrote what a lying server sent\n"
LIES = [
    "..",
    ".",
    "../x",
    "../../escape",
    "/abs-name",
    "/tmp",
    "a/b",
    "nul\x00name",
    "2020-01-01_000000/../../x",
    "snapshot_2020-01-01_000000.db/../../y",
]


def is_lie(path):
    """Whether a client path names a lie rather than something real."""
    parts = path.split("/")
    return (
        "\x00" in path
        or ".." in parts
        or any(l in path for l in LIES if len(l) > 2)
    )


def lie_attrs(name):
    a = SFTPAttributes()
    a.filename = name
    a.st_size = len(HOSTILE)
    a.st_mode = 0o100644
    a.st_mtime = a.st_atime = 1577836800
    a.st_uid = a.st_gid = 0
    return a


class Handle(SFTPHandle):
    def __init__(self, f=None, data=None):
        super().__init__()
        self.f = f
        self.data = data
        if f is not None:
            self.readfile = f
            self.writefile = f

    def read(self, offset, length):
        if self.data is not None:
            return self.data[offset : offset + length]
        return super().read(offset, length)

    def stat(self):
        if self.data is not None:
            return lie_attrs("")
        return SFTPAttributes.from_stat(os.fstat(self.f.fileno()))

    def close(self):
        if self.f is not None:
            self.f.close()
        return SFTP_OK


class Lying(SFTPServerInterface):
    root = None

    def real(self, path):
        return os.path.join(self.root, os.path.normpath("/" + path).lstrip("/"))

    def list_folder(self, path):
        try:
            full = self.real(path)
            out = []
            for name in os.listdir(full):
                out.append(SFTPAttributes.from_stat(os.lstat(os.path.join(full, name)), name))
            out.extend(lie_attrs(l) for l in LIES)
            return out
        except OSError as e:
            return SFTPServer.convert_errno(e.errno)

    def stat(self, path):
        if is_lie(path):
            return lie_attrs(os.path.basename(path))
        try:
            return SFTPAttributes.from_stat(os.stat(self.real(path)))
        except OSError as e:
            return SFTPServer.convert_errno(e.errno)

    def lstat(self, path):
        if is_lie(path):
            return lie_attrs(os.path.basename(path))
        try:
            return SFTPAttributes.from_stat(os.lstat(self.real(path)))
        except OSError as e:
            return SFTPServer.convert_errno(e.errno)

    def open(self, path, flags, attr):
        if is_lie(path):
            if flags & (os.O_WRONLY | os.O_RDWR):
                return SFTPServer.convert_errno(errno.EACCES)
            return Handle(data=HOSTILE)
        try:
            fd = os.open(self.real(path), flags, 0o600)
            mode = "rb"
            if flags & os.O_WRONLY:
                mode = "wb"
            elif flags & os.O_RDWR:
                mode = "r+b"
            return Handle(f=os.fdopen(fd, mode))
        except OSError as e:
            return SFTPServer.convert_errno(e.errno)

    def remove(self, path):
        if is_lie(path):
            return SFTPServer.convert_errno(errno.EACCES)
        try:
            os.remove(self.real(path))
            return SFTP_OK
        except OSError as e:
            return SFTPServer.convert_errno(e.errno)

    def rename(self, oldpath, newpath):
        if is_lie(oldpath) or is_lie(newpath):
            return SFTPServer.convert_errno(errno.EACCES)
        try:
            os.rename(self.real(oldpath), self.real(newpath))
            return SFTP_OK
        except OSError as e:
            return SFTPServer.convert_errno(e.errno)

    def mkdir(self, path, attr):
        if is_lie(path):
            return SFTPServer.convert_errno(errno.EACCES)
        try:
            os.mkdir(self.real(path), 0o700)
            return SFTP_OK
        except OSError as e:
            return SFTPServer.convert_errno(e.errno)

    def rmdir(self, path):
        if is_lie(path):
            return SFTPServer.convert_errno(errno.EACCES)
        try:
            os.rmdir(self.real(path))
            return SFTP_OK
        except OSError as e:
            return SFTPServer.convert_errno(e.errno)

    def canonicalize(self, path):
        return os.path.normpath("/" + path)


class Server(paramiko.ServerInterface):
    def get_allowed_auths(self, username):
        return "publickey"

    def check_auth_publickey(self, username, key):
        return paramiko.AUTH_SUCCESSFUL

    def check_channel_request(self, kind, chanid):
        if kind == "session":
            return paramiko.OPEN_SUCCEEDED
        return paramiko.OPEN_FAILED_ADMINISTRATIVELY_PROHIBITED


def serve(conn, host_key):
    t = paramiko.Transport(conn)
    t.add_server_key(host_key)
    t.set_subsystem_handler("sftp", SFTPServer, Lying)
    try:
        t.start_server(server=Server())
        while t.is_active():
            t.join(1)
    except Exception:
        pass


def main():
    Lying.root = os.path.realpath(sys.argv[1])
    host_key = paramiko.Ed25519Key(filename=sys.argv[2])
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    tmp = sys.argv[3] + ".tmp"
    with open(tmp, "w") as f:
        f.write(str(sock.getsockname()[1]))
    os.rename(tmp, sys.argv[3])

    def watch_parent():
        sys.stdin.read()
        os._exit(0)

    threading.Thread(target=watch_parent, daemon=True).start()
    while True:
        conn, _ = sock.accept()
        threading.Thread(target=serve, args=(conn, host_key), daemon=True).start()


if __name__ == "__main__":
    main()
