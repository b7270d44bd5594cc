#ifndef COPENBLAS_SHIM_H
#define COPENBLAS_SHIM_H
#include <cblas.h>
// OpenBLAS extensions (declared in openblas_config.h / cblas.h of OpenBLAS).
int openblas_get_num_threads(void);
void openblas_set_num_threads(int num_threads);
#endif
