r"""Alanine dipeptide (Ace-Ala-Nme, 22 atoms): topology, dihedrals, atom encodings, targets.

Atom order (``assets/ad2/alanine-dipeptide.pdb``, mdtraj names; every AD2 array in the
repository uses it, particle-major, ``x.reshape(22, 3)``):

    0 H1(ACE)  1 CH3(ACE)  2 H2(ACE)  3 H3(ACE)  4 C(ACE)  5 O(ACE)
    6 N  7 H  8 CA  9 HA  10 CB  11 HB1  12 HB2  13 HB3  14 C  15 O          (ALA)
    16 N(NME)  17 H(NME)  18 C(NME)  19 H1(NME)  20 H2(NME)  21 H3(NME)

Backbone dihedrals: φ = dihedral(C4, N6, CA8, C14), ψ = dihedral(N6, CA8, C14, N16).

Units: the model sees coordinates in **nanometres**, as the MD data are stored; energies
are reduced, u = E/k_BT at 300 K, and forces are −∇u in k_BT per nm (typical magnitude
10²–10³). Conversions live in :mod:`zoo.systems.alanine.engines`, nowhere else.
"""

from __future__ import annotations

import functools
from typing import ClassVar

import equinox as eqx
import jax.numpy as jnp
import numpy as np

from zoo import resources
from zoo._types import Array, Scalar
from zoo.flows.base import AbstractBase, MeanFreeNormal
from zoo.systems.alanine.engines import OpenMMEngine, XTBEngine, engine_energy, engine_energy_and_force
from zoo.systems.particles import AbstractParticleSystem

N_ATOMS = 22
PDB_PATH = resources.ASSETS / "ad2" / "alanine-dipeptide.pdb"

ATOM_NAMES = (
    "H1", "CH3", "H2", "H3", "C", "O",
    "N", "H", "CA", "HA", "CB", "HB1", "HB2", "HB3", "C", "O",
    "N", "H", "C", "H1", "H2", "H3",
)  # fmt: skip
ELEMENTS = (
    "H", "C", "H", "H", "C", "O",
    "N", "H", "C", "H", "C", "H", "H", "H", "C", "O",
    "N", "H", "C", "H", "H", "H",
)  # fmt: skip
ATOMIC_NUMBERS = tuple({"H": 1, "C": 6, "N": 7, "O": 8}[e] for e in ELEMENTS)
PHI_ATOMS = (4, 6, 8, 14)  # C(ACE)–N–CA–C
PSI_ATOMS = (6, 8, 14, 16)  # N–CA–C–N(NME)
BACKBONE_ATOMS = (4, 6, 8, 14, 16)  # the atoms of φ and ψ
CHIRAL_ATOMS = (8, 6, 14, 10)  # the stereocentre CA and its N, C and CB neighbours
ENCODINGS = ("tbg", "efm")

# GFN2-xTB total energies of AD2 are about −33 Hartree (≈ −3.5·10⁴ k_BT): subtracting this
# constant keeps u of order 10² so float32 resolves it; it does not change the density.
XTB_ENERGY_OFFSET_HARTREE = -33.0


@functools.cache
def topology():
    """The mdtraj Topology of the shipped PDB (bonds from mdtraj's residue templates)."""
    import mdtraj

    return mdtraj.load_topology(str(PDB_PATH))


def bonds() -> np.ndarray:
    """The 21 covalent bonds as sorted index pairs, shape (21, 2)."""
    pairs = sorted(tuple(sorted((b[0].index, b[1].index))) for b in topology().bonds)
    return np.asarray(pairs, dtype=np.int32)


def efm_encoding() -> np.ndarray:
    """Atom classes of the equivariant-flow-matching model (Klein et al. 2023), shape (22,).

    Elements H, C, N, O are classes 0–3; the five backbone atoms C4, N6, CA8, C14, N16
    get their own classes 4–8:

        [0, 1, 0, 0, 4, 3, 5, 0, 6, 0, 1, 0, 0, 0, 7, 3, 8, 0, 1, 0, 0, 0]
    """
    codes = np.array(["HCNO".index(e) for e in ELEMENTS], dtype=np.int32)
    codes[list(BACKBONE_ATOMS)] = np.arange(4, 4 + len(BACKBONE_ATOMS))
    return codes


def tbg_encoding() -> np.ndarray:
    """Atom classes of the transferable-BG model (Klein & Noé 2024), shape (22,), 16 classes.

    Every atom is its own class except hydrogens bonded to the same carbon (the three
    methyl groups), which share one; classes are numbered in order of first appearance:

        [0, 1, 0, 0, 2, 3, 4, 5, 6, 7, 8, 9, 9, 9, 10, 11, 12, 13, 14, 15, 15, 15]

    (The TBG reference code sets ``atom_types[[1, 2, 3]] = 2``, which in this atom order
    would group the ACE methyl carbon with two of its hydrogens; we group by bonds, which
    is what the paper describes.)
    """
    group = np.arange(N_ATOMS)
    for i, j in bonds():
        for h, c in ((i, j), (j, i)):
            if ELEMENTS[h] == "H" and ELEMENTS[c] == "C":
                group[h] = N_ATOMS + c  # hydrogens on carbon c share a group id
    _, first, inverse = np.unique(group, return_index=True, return_inverse=True)
    # Renumber by first appearance so the codes read left to right.
    order = np.argsort(np.argsort(first))
    return order[inverse].astype(np.int32)


def encoding(name: str) -> np.ndarray:
    """The atom encoding called ``name`` ('tbg' or 'efm'), shape (22,)."""
    if name == "tbg":
        return tbg_encoding()
    if name == "efm":
        return efm_encoding()
    raise ValueError(f"unknown alanine dipeptide encoding {name!r}; expected one of {ENCODINGS}")


def dihedral(p0: Array, p1: Array, p2: Array, p3: Array) -> Scalar:
    r"""Dihedral angle in radians, (−π, π], of four points (3,) each (IUPAC sign, as mdtraj).

    With b1 = p1 − p0, b2 = p2 − p1, b3 = p3 − p2:
    $$θ = \operatorname{atan2}\big(\|b_2\|\, b_1·(b_2×b_3),\ (b_1×b_2)·(b_2×b_3)\big).$$
    """
    b1, b2, b3 = p1 - p0, p2 - p1, p3 - p2
    n1, n2 = jnp.cross(b1, b2), jnp.cross(b2, b3)
    y = jnp.linalg.norm(b2) * jnp.dot(b1, n2)
    x = jnp.dot(n1, n2)
    return jnp.arctan2(y, x)


def dihedrals(x: Array) -> tuple[Scalar, Scalar]:
    """(φ, ψ) in radians of ONE configuration, flat (66,) or (22, 3); batch with ``jax.vmap``."""
    x = jnp.asarray(x)
    if x.shape not in ((3 * N_ATOMS,), (N_ATOMS, 3)):
        raise ValueError(f"alanine dipeptide configurations have shape (66,) or (22, 3), got {x.shape}")
    p = x.reshape(N_ATOMS, 3)
    return dihedral(*p[np.array(PHI_ATOMS)]), dihedral(*p[np.array(PSI_ATOMS)])


def handedness(x) -> np.ndarray:
    """Sign of the signed volume (N − CA)·((C − CA) × (CB − CA)) at the CA stereocentre.

    ``x`` is a batch (n, 66) or (n, 22, 3), or one configuration; mirror images have
    opposite signs. Compare with :func:`l_handedness`, the sign of the shipped L structure.
    """
    p = np.asarray(x, dtype=np.float64).reshape(-1, N_ATOMS, 3)
    ca, n, c, cb = (p[:, i] for i in CHIRAL_ATOMS)
    volume = np.einsum("bi,bi->b", n - ca, np.cross(c - ca, cb - ca))
    return np.sign(volume)


@functools.cache
def l_handedness() -> float:
    """The handedness of L-alanine, read off the shipped PDB (so no sign convention is assumed)."""
    import mdtraj

    return float(handedness(mdtraj.load(str(PDB_PATH)).xyz[0])[0])


class _AlanineDipeptide(AbstractParticleSystem):
    """Shared parts of the AD2 targets: 22 atoms in 3-D, nm, engine-backed energy."""

    n_particles: int = eqx.field(static=True, default=N_ATOMS, init=False)
    spatial_dim: int = eqx.field(static=True, default=3, init=False)

    encoding: eqx.AbstractVar[str]
    fold_mirror_images: eqx.AbstractVar[bool]
    # Settings that change how the target is evaluated or fed to a field, not the Boltzmann
    # density: a stored data set is valid for any value of these.
    data_independent_fields: ClassVar[tuple[str, ...]] = ("encoding", "platform", "n_workers", "fold_mirror_images")

    def __check_init__(self):
        if self.encoding not in ENCODINGS:
            raise ValueError(f"unknown alanine dipeptide encoding {self.encoding!r}; expected one of {ENCODINGS}")

    @property
    def engine(self):
        raise NotImplementedError

    def energy(self, x: Array) -> Scalar:
        """u(x) = E(x)/k_BT of one configuration (66,) or (22, 3) in nm."""
        return engine_energy(self.engine, self.flat(x))

    def energy_and_force(self, x: Array) -> tuple[Scalar, Array]:
        """(u, −∇u) of one flat configuration from a single engine call."""
        u, f = engine_energy_and_force(self.engine, self.flat(x))
        return u, f.reshape(jnp.shape(x))

    def energies_and_forces(self, positions) -> tuple[np.ndarray, np.ndarray]:
        """Host-side (u (b,), f (b, 66)) of a NumPy batch in nm, float64, without JAX."""
        u, f = self.engine.reduced(positions)
        return u, f.reshape(f.shape[0], -1)

    def default_base(self) -> AbstractBase:
        return MeanFreeNormal(self.n_particles, self.spatial_dim)

    def fold(self, flow, x, log_q) -> tuple:
        r"""Fold the D enantiomer onto L: the target is L-alanine dipeptide only.

        The energy is mirror-symmetric, but the data (MD from the L structure, which never
        inverts) hold one enantiomer. A reflection-equivariant field on a symmetric base
        gives $x$ and its mirror image $-x$ the same density, so half of its samples are
        D-alanine dipeptide. Inverting those ($x \to -x$) samples the folded density
        $q'(x) = q(x) + q(-x) = 2q(x)$ on the L side: log q' = log q + log 2, for model and
        target samples alike. Flows without that symmetry are returned unchanged (their
        D samples stay, as they would in any observable). ``fold_mirror_images=False``
        turns this off.
        """
        x, log_q = np.asarray(x), np.asarray(log_q)
        if not (self.fold_mirror_images and flow.field.reflection_equivariant and flow.base.reflection_symmetric):
            return x, log_q
        mirrored = handedness(x) != l_handedness()
        return np.where(mirrored[:, None], -x, x), log_q + np.log(2.0)

    def topology(self):
        return topology()

    def field_kwargs(self) -> dict:
        return {**super().field_kwargs(), "atom_types": encoding(self.encoding)}


class AlanineDipeptideClassical(_AlanineDipeptide):
    """Alanine dipeptide, Amber ff99SB-ILDN + OBC implicit solvent (OpenMM), 300 K, nm.

    No cutoff, no constraints, Reference platform; u = E/k_BT, forces in k_BT/nm.
    ``encoding`` picks the atom classes ``field_kwargs()['atom_types']`` hands the EGNN.
    """

    encoding: str = eqx.field(static=True, default="tbg")
    fold_mirror_images: bool = eqx.field(static=True, default=True)
    temperature: float = eqx.field(static=True, default=300.0)
    platform: str = eqx.field(static=True, default="Reference")

    @property
    def engine(self) -> OpenMMEngine:
        return OpenMMEngine(str(PDB_PATH), N_ATOMS, platform=self.platform, temperature=self.temperature)


class AlanineDipeptideXTB(_AlanineDipeptide):
    """Alanine dipeptide with GFN2-xTB (tblite), 300 K, nm; batches spread over processes.

    u = (E − E_offset)/k_BT with E_offset = ``energy_offset`` Hartree (a constant, so the
    Boltzmann density is unchanged); forces in k_BT/nm. ``n_workers`` spawned processes
    with one OpenMP thread each share a batch (0: evaluate in this process).
    """

    encoding: str = eqx.field(static=True, default="tbg")
    fold_mirror_images: bool = eqx.field(static=True, default=True)
    temperature: float = eqx.field(static=True, default=300.0)
    n_workers: int = eqx.field(static=True, default=2)
    energy_offset: float = eqx.field(static=True, default=XTB_ENERGY_OFFSET_HARTREE)
    method: str = eqx.field(static=True, default="GFN2-xTB")

    @property
    def engine(self) -> XTBEngine:
        return XTBEngine(
            ATOMIC_NUMBERS,
            method=self.method,
            energy_offset=self.energy_offset,
            n_workers=self.n_workers,
            temperature=self.temperature,
        )
