"""Two (or more) hospitals on this machine, for real: a Flower SuperLink and one SuperNode per site as separate
processes on the loopback address, TLS on, each SuperNode reading its own site's folder and keeping its state
in its own folder; then one covidct run on them, then everything stopped.

`python -m covidct.federated.hospitals --workdir DIR [--data-root DIR] [--sites A,B] [--port 18000] [RUN OVERRIDES]`

The run overrides go to `python -m covidct.run` (e.g. `experiment=fedbn +protocol=cpu fold=0`), which this
command gives `federated.runtime=deployment` and the SuperLink's address and CA certificate. Across the internet
each hospital runs its own `flower-supernode` the same way (docs/federated.md).
"""

from __future__ import annotations

import argparse
import datetime
import ipaddress
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from covidct.cli import cli_errors
from covidct.errors import ConfigError

BIN = Path(sys.executable).parent
STARTUP_S = 60  # how long the SuperLink may take to listen


def _certificate(subject: str, key: ec.EllipticCurvePrivateKey, issuer: tuple[str, ec.EllipticCurvePrivateKey] | None):
    """A one-day certificate for `subject`, self-signed (the CA) or signed by `issuer`, valid for 127.0.0.1."""
    now = datetime.datetime.now(datetime.timezone.utc)
    issuer_name, signer = issuer or (subject, key)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
        .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer_name)]))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=issuer is None, path_length=None), critical=True)
    )
    if issuer is not None:
        names = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    return builder.sign(signer, hashes.SHA256())


def write_tls(folder: Path) -> dict[str, Path]:
    """A throw-away CA and the SuperLink's certificate signed by it, as PEM files in `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    ca_key, server_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca = _certificate("covidct test CA", ca_key, None)
    server = _certificate("localhost", server_key, ("covidct test CA", ca_key))
    files = {"ca": folder / "ca.pem", "cert": folder / "superlink.pem", "key": folder / "superlink.key"}
    files["ca"].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    files["cert"].write_bytes(server.public_bytes(serialization.Encoding.PEM))
    private = server_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    files["key"].write_bytes(private)
    files["key"].chmod(0o600)
    return files


def _wait_for_port(port: int, process: subprocess.Popen) -> None:
    deadline = time.monotonic() + STARTUP_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise ConfigError(f"the SuperLink stopped at start (status {process.returncode}); see its log.")
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise ConfigError(f"the SuperLink did not listen on 127.0.0.1:{port} within {STARTUP_S} s; see its log.")


def _stop(processes: Sequence[subprocess.Popen]) -> None:
    for process in processes:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
    for process in processes:
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


@cli_errors
def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m covidct.federated.hospitals", description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, required=True, help="the processes' logs, TLS files and site states")
    parser.add_argument("--data-root", type=Path, default=Path(os.environ.get("COVIDCT_DATA", "data")))
    parser.add_argument("--sites", default="A,B", help="one SuperNode per site (comma-separated)")
    parser.add_argument("--port", type=int, default=18000, help="the SuperLink's port on 127.0.0.1")
    args, overrides = parser.parse_known_args(argv)
    sites = [site for site in args.sites.split(",") if site]
    workdir = args.workdir.absolute()
    with socket.socket() as probe:
        if probe.connect_ex(("127.0.0.1", args.port)) == 0:  # another SuperLink (or anything) would get the run
            raise ConfigError(f"127.0.0.1:{args.port} is in use; choose another --port.")
    tls = write_tls(workdir / "tls")
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    logs = workdir / "logs"
    logs.mkdir(parents=True, exist_ok=True)

    def start(name: str, command: list[str]) -> subprocess.Popen:
        """A process of its own session (stopped with its children), its log and pid in the work folder."""
        log = (logs / f"{name}.log").open("w")
        process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        (logs / f"{name}.pid").write_text(f"{process.pid}\n")
        return process

    # a new SuperLink each time: one's database would keep the nodes of an earlier start, gone since (the run's
    # state is in its folder, the sites' in theirs)
    for leftover in ("superlink.db", "superlink.db-wal", "superlink.db-shm"):  # SQLite's write-ahead log too
        (workdir / leftover).unlink(missing_ok=True)
    superlink = start(
        "superlink",
        [str(BIN / "flower-superlink"), "--port", str(args.port), "--database", str(workdir / "superlink.db")]
        + ["--ssl-certfile", str(tls["cert"]), "--ssl-keyfile", str(tls["key"]), "--ssl-ca-certfile", str(tls["ca"])],
    )
    processes = [superlink]
    try:
        _wait_for_port(args.port, superlink)
        for index, site in enumerate(sites):
            node = f"site='{site}' data-root='{args.data_root.absolute()}' state-dir='{workdir / 'sites'}' threads=1"
            processes.append(
                start(
                    f"supernode-{site}",
                    [str(BIN / "flower-supernode"), "--superlink", f"127.0.0.1:{args.port}"]
                    + ["--root-certificates", str(tls["ca"]), "--node-config", node]
                    + ["--port", str(args.port + 1 + index)],
                )
            )
        run = [sys.executable, "-m", "covidct.run", *overrides, f"data.sites=[{','.join(sites)}]"]
        run += ["federated.runtime=deployment", f"federated.superlink=127.0.0.1:{args.port}"]
        run += [f"federated.root_certificates={tls['ca']}"]
        return subprocess.run(run, env=env).returncode
    finally:
        _stop(processes)


if __name__ == "__main__":
    sys.exit(main())
