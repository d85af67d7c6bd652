# Spack recipe for sinkscope. Use it from a repo of your own:
#   spack repo add cluster/spack        (the folder holds repo.yaml and packages/)
#   spack install sinkscope +mpi +cuda cuda_arch=90
from spack.package import *


class Sinkscope(CMakePackage, CudaPackage):
    """Finds the position-zero attention sink circuit in MoE language models: instrumented
    forward passes of Hugging Face checkpoints, HDF5 (netCDF-4 layout) analysis files."""

    homepage = "https://github.com/sinkscope/sinkscope"
    git = "https://github.com/sinkscope/sinkscope.git"

    version("main", branch="main")

    variant("mpi", default=True, description="Distributed CPU runs over MPI")
    # +cuda and cuda_arch come from CudaPackage.

    depends_on("cmake@3.22:", type="build")
    depends_on("nlohmann-json@3:")
    depends_on("cli11@2:")
    depends_on("hdf5@1.10:+hl~mpi")
    depends_on("boost@1.74:+serialization")
    depends_on("openblas")
    depends_on("mpi", when="+mpi")
    depends_on("nccl", when="+cuda")
    depends_on("googletest", type="test")
    depends_on("python@3.9:", type="run")
    depends_on("py-numpy", type="run")
    depends_on("py-h5py", type="run")
    depends_on("py-matplotlib", type="run")
    depends_on("py-xarray", type="run")
    depends_on("py-h5netcdf", type="run")
    depends_on("py-pandas", type="run")

    conflicts("cuda_arch=none", when="+cuda", msg="give the GPU architecture: cuda_arch=90 (H100/H200)")

    def cmake_args(self):
        args = [
            self.define_from_variant("SINKSCOPE_MPI", "mpi"),
            self.define_from_variant("SINKSCOPE_CUDA", "cuda"),
            self.define("SINKSCOPE_TESTS", self.run_tests),
        ]
        if self.spec.satisfies("+cuda"):
            archs = self.spec.variants["cuda_arch"].value
            # sinkscope's wgmma kernels need the architecture-specific 90a on Hopper.
            args.append(self.define("CMAKE_CUDA_ARCHITECTURES",
                                    ";".join("90a" if a == "90" else a for a in archs)))
        return args

    def setup_run_environment(self, env):
        env.prepend_path("PYTHONPATH", self.prefix.share.sinkscope.python)
