import COpenBLAS

/// Matrix multiplies through OpenBLAS `cblas_sgemm` (row-major).
public enum BLAS {
    /// Number of threads OpenBLAS uses.
    public static var threads: Int {
        get { Int(openblas_get_num_threads()) }
        set { openblas_set_num_threads(Int32(newValue)) }
    }

    /// Runs `body` with OpenBLAS single-threaded, then restores the thread count: for work that runs its own
    /// products side by side, one per core. Not for use while other threads call BLAS.
    public static func singleThreaded<T>(_ body: () throws -> T) rethrows -> T {
        try withThreads(1, body)
    }

    /// Runs `body` with OpenBLAS at `count` threads, then restores the count. OpenBLAS sums some products
    /// differently at one and at several threads, so work that must repeat earlier results bit for bit runs
    /// at the count they were made with. Going down to one thread, the workers are stopped first: they
    /// busy-wait for a while after each threaded product (taking the core a second caller needs); the next
    /// threaded product starts them again (as after a fork). Not for use while other threads call BLAS.
    public static func withThreads<T>(_ count: Int, _ body: () throws -> T) rethrows -> T {
        let before = threads
        let count = max(1, count)
        if before == count { return try body() }
        if count == 1 { _ = blas_thread_shutdown_() }
        threads = count
        defer { threads = before }
        return try body()
    }

    /// C[M,N] = alpha · op(A)[M,K] · op(B)[K,N] + beta · C, row-major, with leading dimensions.
    /// `transA`: A is stored [K, M] (lda ≥ M) instead of [M, K] (lda ≥ K); likewise `transB`.
    @inline(__always)
    public static func gemm(
        _ c: UnsafeMutablePointer<Float>, _ a: UnsafePointer<Float>, _ b: UnsafePointer<Float>,
        M: Int, N: Int, K: Int,
        transA: Bool = false, transB: Bool = false,
        alpha: Float = 1, beta: Float = 0,
        lda: Int? = nil, ldb: Int? = nil, ldc: Int? = nil
    ) {
        if M == 0 || N == 0 { return }
        let la = lda ?? (transA ? M : K)
        let lb = ldb ?? (transB ? K : N)
        let lc = ldc ?? N
        cblas_sgemm(CblasRowMajor, transA ? CblasTrans : CblasNoTrans, transB ? CblasTrans : CblasNoTrans,
                    Int32(M), Int32(N), Int32(K), alpha, a, Int32(max(la, 1)), b, Int32(max(lb, 1)), beta, c,
                    Int32(max(lc, 1)))
    }

    /// C[N,N] = alpha · AᵀA + beta · C for A [K, N] row-major, computed on the upper triangle and mirrored to
    /// the lower one, so that C comes out exactly symmetric (the lower half of the C given is not read).
    public static func syrk(_ c: UnsafeMutablePointer<Float>, _ a: UnsafePointer<Float>, N: Int, K: Int,
                            alpha: Float = 1, beta: Float = 0) {
        if N == 0 { return }
        cblas_ssyrk(CblasRowMajor, CblasUpper, CblasTrans, Int32(N), Int32(K), alpha, a, Int32(max(N, 1)), beta, c, Int32(max(N, 1)))
        // Mirrored in tiles, so that the strided reads of the upper triangle stay in cache.
        let tile = 64
        for ib in stride(from: 0, to: N, by: tile) {
            for jb in stride(from: 0, through: ib, by: tile) {
                for i in ib..<min(ib + tile, N) { for j in jb..<min(jb + tile, i) { c[i * N + j] = c[j * N + i] } }
            }
        }
    }

    /// y[M] = alpha · A[M, N] · x[N] + beta · y (`trans`: y[N] = alpha · Aᵀ · x[M] + beta · y), row-major A
    /// with rows `lda` apart (N when nil).
    public static func gemv(_ y: UnsafeMutablePointer<Float>, _ a: UnsafePointer<Float>, _ x: UnsafePointer<Float>,
                            M: Int, N: Int, trans: Bool = false, alpha: Float = 1, beta: Float = 0, lda: Int? = nil) {
        if M == 0 || N == 0 { return }
        cblas_sgemv(CblasRowMajor, trans ? CblasTrans : CblasNoTrans, Int32(M), Int32(N), alpha, a, Int32(max(lda ?? N, 1)),
                    x, 1, beta, y, 1)
    }

    /// y = alpha · x + y
    @inline(__always)
    public static func axpy(_ y: UnsafeMutablePointer<Float>, _ x: UnsafePointer<Float>, count: Int, alpha: Float) {
        cblas_saxpy(Int32(count), alpha, x, 1, y, 1)
    }

    /// x = alpha · x
    @inline(__always)
    public static func scal(_ x: UnsafeMutablePointer<Float>, count: Int, alpha: Float) {
        cblas_sscal(Int32(count), alpha, x, 1)
    }

    /// Dot product.
    @inline(__always)
    public static func dot(_ x: UnsafePointer<Float>, _ y: UnsafePointer<Float>, count: Int) -> Float {
        cblas_sdot(Int32(count), x, 1, y, 1)
    }
}

extension Tensor {
    /// out = self · other for 2-D tensors (with optional transposes), a new tensor.
    public func matmul(_ other: Tensor, transSelf: Bool = false, transOther: Bool = false) -> Tensor {
        precondition(rank == 2 && other.rank == 2, "matmul needs 2-D tensors")
        let M = transSelf ? shape[1] : shape[0]
        let K = transSelf ? shape[0] : shape[1]
        let K2 = transOther ? other.shape[1] : other.shape[0]
        let N = transOther ? other.shape[0] : other.shape[1]
        precondition(K == K2, "matmul: inner dimensions \(shape) · \(other.shape)")
        let out = Tensor(shape: [M, N])
        BLAS.gemm(out.data, data, other.data, M: M, N: N, K: K, transA: transSelf, transB: transOther)
        return out
    }
}
