"""Put a large file into a layout through aiofiles, and write the blob back out through aiofiles (asyncio).

    python examples/aiofiles_io.py [WORKDIR] [--mib N]

An aiofiles file has ``async read(n)``, so it is a blob source as it is; a blob
reader is an async iterator of verified chunks, so writing one out is a loop.
aiofiles runs on asyncio only: on trio, use ``anyio.open_file`` the same way.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import random
import tempfile
from pathlib import Path

import aiofiles

import ocicas

MIB = 1 << 20


async def file_digest(path: Path) -> str:
    """The sha256 digest of a file, read through aiofiles."""
    hasher = hashlib.sha256()
    async with aiofiles.open(path, "rb") as f:
        while chunk := await f.read(4 * MIB):
            hasher.update(chunk)
    return f"sha256:{hasher.hexdigest()}"


async def main(workdir: Path, mib: int = 64) -> None:
    source, layout, copy = workdir / "big.bin", workdir / "layout", workdir / "copy.bin"
    rng = random.Random(0)
    async with aiofiles.open(source, "wb") as f:  # a large file to store
        for _ in range(mib):
            await f.write(rng.randbytes(MIB))

    await ocicas.create_layout(layout)
    async with await ocicas.open_layout(layout) as engine:
        async with aiofiles.open(source, "rb") as f:
            digest, size = await engine.put_blob(f)  # streamed in chunks, hashed on worker threads
        print(f"stored {source.name}: {digest} ({size} bytes)")

        async with aiofiles.open(source, "rb") as f:
            try:  # content that is not what the caller expects is refused before anything is stored
                await engine.put_blob(f, expected_digest=ocicas.Digest.from_bytes(b"something else"))
            except ocicas.DigestMismatchError:
                print(f"wrong expected digest refused; blobs stored: {len(await engine.list_blobs())}")

        async with await engine.get_blob(digest) as reader, aiofiles.open(copy, "wb") as out:
            async for chunk in reader:  # each chunk verified; the last only once the digest checked out
                await out.write(chunk)
    print(f"{copy.name} is {source.name}: {await file_digest(copy) == await file_digest(source) == digest}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("workdir", nargs="?", type=Path, default=None)
    parser.add_argument("--mib", type=int, default=64, help="size of the file to store, in MiB")
    args = parser.parse_args()
    asyncio.run(main(args.workdir or Path(tempfile.mkdtemp(prefix="ocicas-")), args.mib))
