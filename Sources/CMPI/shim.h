#ifndef CMPI_SHIM_H
#define CMPI_SHIM_H
#include <mpi.h>

// Open MPI's handles (MPI_COMM_WORLD, MPI_FLOAT, MPI_SUM, ...) are macros over the addresses of
// global objects, which Swift does not import; these return them.
static inline MPI_Comm dafnet_mpi_comm_world(void) { return MPI_COMM_WORLD; }
static inline MPI_Datatype dafnet_mpi_float(void) { return MPI_FLOAT; }
static inline MPI_Datatype dafnet_mpi_double(void) { return MPI_DOUBLE; }
static inline MPI_Datatype dafnet_mpi_byte(void) { return MPI_BYTE; }
static inline MPI_Op dafnet_mpi_sum(void) { return MPI_SUM; }
static inline MPI_Errhandler dafnet_mpi_errors_return(void) { return MPI_ERRORS_RETURN; }
static inline void *dafnet_mpi_in_place(void) { return MPI_IN_PLACE; }
static inline int dafnet_mpi_success(void) { return MPI_SUCCESS; }
#endif
