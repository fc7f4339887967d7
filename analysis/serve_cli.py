"""`saeforge serve FEATURES_DIR [--port 8000] [--host 127.0.0.1]`

Serves the viewer of a `saeforge features` directory and live endpoints (paste text → each token's
top latents; steer with a latent → base and steered generations side by side). The model and the
SAE are the ones features.json records, loaded once at start-up."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from saeforge.config import option, parse_config
from saeforge.devices import check_device
from saeforge.errors import UserError


@dataclass
class ServeConfig:
    dir: str = option("", "output directory of `saeforge features`", positional=True)
    host: str = option("127.0.0.1", "address to bind (127.0.0.1: this machine only)")
    port: int = option(8000, "TCP port (0 picks a free one)")
    device: str = option("cpu", "cpu, cuda or cuda:N")
    model: str | None = option(None, "model spec (default: the one features.json records)")
    sae: str | None = option(None, "SAE directory (default: the one features.json records)")
    no_live: bool = option(False, "serve the viewer only: no model, no live endpoints")

    def validate(self) -> None:
        if not self.dir:
            raise UserError("give the features directory: saeforge serve DIR")
        if not 0 <= self.port <= 65535:
            raise UserError(f"--port {self.port} is not a TCP port; use 1..65535 (or 0 for a free one)")
        check_device(self.device)


def main(argv: Sequence[str] | None = None) -> int:
    from analysis.features_io import load_features
    from analysis.serve import Live, make_server

    cfg, _ = parse_config(ServeConfig, argv, section="serve", prog="saeforge serve",
                          description="Serve the viewer of a features directory with live endpoints.")
    load_features(cfg.dir)
    live = None
    if not cfg.no_live:
        print("loading the model and SAE…", flush=True)
        live = Live.from_features(cfg.dir, cfg.device, cfg.model, cfg.sae)
    try:
        server = make_server(cfg.dir, live, cfg.host, cfg.port)
    except OSError as e:
        raise UserError(f"cannot listen on {cfg.host}:{cfg.port} ({e.strerror or e}); pick another --port") from None
    host, port = str(server.server_address[0]), int(server.server_address[1])
    shown = f"[{host}]" if ":" in str(host) else host
    print(f"serving {cfg.dir} at http://{shown}:{port}/  (live: {'on' if live else 'off'}; Ctrl-C stops)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        print("stopped")
    finally:
        server.server_close()
    return 0
