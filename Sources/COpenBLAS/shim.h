#ifndef COPENBLAS_SHIM_H
#define COPENBLAS_SHIM_H
#include <cblas.h>
// OpenBLAS extensions (declared in openblas_config.h / cblas.h of OpenBLAS).
int openblas_get_num_threads(void);
void openblas_set_num_threads(int num_threads);
// Stops OpenBLAS's worker threads (what its fork handler calls); the next threaded call starts them again.
int blas_thread_shutdown_(void);
// The LAPACK routines OpenBLAS carries (Fortran calling convention, column-major): Cholesky
// factorisation of a symmetric positive definite matrix in double precision.
void dpotrf_(const char *uplo, const int *n, double *a, const int *lda, int *info);
// Eigenvalues and eigenvectors of a symmetric matrix (divide and conquer), double precision.
void dsyevd_(const char *jobz, const char *uplo, const int *n, double *a, const int *lda, double *w,
             double *work, const int *lwork, int *iwork, const int *liwork, int *info);
#endif
